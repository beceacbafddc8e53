"""`make bench`: every benchmark of the project, each printing a markdown table; the tables are
also written to bench/results/. Each benchmark compares against its baseline in the same run."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = [
    ("log", [sys.executable, str(HERE / "bench_log.py")]),
    ("differ", [sys.executable, str(HERE / "bench_differ.py"), "--size-gib", "1"]),
    ("images", [sys.executable, str(HERE / "bench_images.py")]),
]


def main() -> int:
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    failed = []
    for name, argv in BENCHES:
        print(f"\n## {name}\n", flush=True)
        t = time.monotonic()
        r = subprocess.run(argv, capture_output=True, text=True, cwd=HERE.parent)
        print(r.stdout + (r.stderr if r.returncode else ""), flush=True)
        (out_dir / f"{name}.md").write_text(f"# {name}\n\n{r.stdout}")
        print(f"({name}: {time.monotonic() - t:.0f} s)")
        if r.returncode:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
