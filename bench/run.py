"""`make bench`: every benchmark of the project, each printing a markdown table; the tables are
also written to bench/results/. Each benchmark compares against its baseline in the same run.

The migration benchmark (real VMs, ~15 min) comes last and writes its own report, JSON and plots
(``bench/results/migration.*``); progress of every benchmark goes to stderr as it happens."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES: list[tuple[str, list[str], bool]] = [
    # (name, argv, writes its own results)
    ("log", [sys.executable, str(HERE / "bench_log.py")], False),
    ("differ", [sys.executable, str(HERE / "bench_differ.py"), "--size-gib", "1"], False),
    ("images", [sys.executable, str(HERE / "bench_images.py")], False),
    ("scaling", [sys.executable, "-m", "bench.bench_scaling", "--out", str(HERE / "results")], True),
    # the handoff service under load: `make loadtest` (~8 min; pins the service to core 0), not in the
    # default run, which must stay under 30 min with the migration benchmark; `make bench BENCH=service`
    ("service", [sys.executable, "-m", "bench.bench_service", "--out", str(HERE / "results")], True),
    ("chain", [sys.executable, str(HERE / "bench_chain.py"), "--out", str(HERE / "results")], True),
    ("roundtrip", [sys.executable, str(HERE / "roundtrip.py")], False),
    # where a save and a restore of the guest spend their time, per libvirt save option (~3 min, one clone)
    ("savepath", [sys.executable, "-m", "bench.bench_savepath", "--out", str(HERE / "results")], True),
    ("migration", [sys.executable, str(HERE / "bench_migration.py"), "--out", str(HERE / "results")], True),
    # issue 13's bytes levers (guest kernel arguments, the zstd level) on real migrations, each
    # variant beside its baseline: ~50 min, `make bench BENCH=levers`
    ("levers", [sys.executable, "-m", "bench.levers", "all", "--out", str(HERE / "results")], True),
]
OPT_IN = frozenset({"service", "scaling", "chain", "levers", "savepath"})
"""Benchmarks run only when named (the default run is every other one, under 30 minutes here): the
load test (~8 min, `make loadtest`), the scaling of each phase with image size (~2.5 min and ~6.5 GiB
of disk, `make bench-scaling`), the backing-chain reads (~2.5 min, `make bench BENCH=chain`), the
bytes levers on real migrations (~50 min, `make bench BENCH=levers`: bench/results/levers.md) and
where a save and a restore spend their time (~3 min, `make bench BENCH=savepath`)."""


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run the benchmarks (all of them by default).")
    names = [b[0] for b in BENCHES]
    ap.add_argument("names", nargs="*", metavar="NAME",
                    help=f"only these benchmarks, in the suite's order ({', '.join(names)}; "
                    f"by default all but {', '.join(sorted(OPT_IN))})")
    only = set(ap.parse_args(argv).names)
    if only - set(names):
        ap.error(f"no benchmark {', '.join(sorted(only - set(names)))} (there are {', '.join(names)})")
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    failed: list[str] = []
    t0 = time.monotonic()
    for name, cmd, writes_own in BENCHES:
        if (name not in only) if only else (name in OPT_IN):
            continue
        print(f"\n## {name}\n", flush=True)
        t = time.monotonic()
        r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=HERE.parent)
        print(r.stdout, flush=True)
        if not writes_own:
            (out_dir / f"{name}.md").write_text(f"# {name}\n\n{r.stdout}")
        print(f"({name}: {time.monotonic() - t:.0f} s)")
        if r.returncode:
            failed.append(f"{name} (exit {r.returncode})")
    print(f"(all: {time.monotonic() - t0:.0f} s)")
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
