"""`make bench`: every benchmark of the project, each printing a markdown table; the tables are
also written to bench/results/. Each benchmark compares against its baseline in the same run.

The migration benchmark (real VMs, ~15 min) comes last and writes its own report, JSON and plots
(``bench/results/migration.*``); progress of every benchmark goes to stderr as it happens."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES: list[tuple[str, list[str], bool]] = [
    # (name, argv, writes its own results)
    ("log", [sys.executable, str(HERE / "bench_log.py")], False),
    ("differ", [sys.executable, str(HERE / "bench_differ.py"), "--size-gib", "1"], False),
    ("images", [sys.executable, str(HERE / "bench_images.py")], False),
    ("roundtrip", [sys.executable, str(HERE / "roundtrip.py")], False),
    ("migration", [sys.executable, str(HERE / "bench_migration.py"), "--out", str(HERE / "results")], True),
]


def main() -> int:
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    failed: list[str] = []
    for name, argv, writes_own in BENCHES:
        print(f"\n## {name}\n", flush=True)
        t = time.monotonic()
        r = subprocess.run(argv, stdout=subprocess.PIPE, text=True, cwd=HERE.parent)
        print(r.stdout, flush=True)
        if not writes_own:
            (out_dir / f"{name}.md").write_text(f"# {name}\n\n{r.stdout}")
        print(f"({name}: {time.monotonic() - t:.0f} s)")
        if r.returncode:
            failed.append(f"{name} (exit {r.returncode})")
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
