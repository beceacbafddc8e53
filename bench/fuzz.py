"""`make fuzz`: every decoder of peer or file bytes, run on at least 100,000 inputs each.

A **fuzz target** (:class:`FuzzTarget`) is a plain function ``run(data: bytes) -> None`` that feeds
one input to a decoder and may raise only the project's own errors
(:class:`~replay_migrate.errors.ReplayMigrateError`), plus a generator ``generate(rng) -> bytes``
that builds a structurally valid input (valid checksums, lengths, compressed payloads) and then
mutates its fields, sizes, counts and payloads: random bytes alone never get past a checksum. The
targets live in :mod:`bench.fuzz_targets`; the unit tests run each on a modest number of
hypothesis-driven inputs (``tests/test_*.py``, in ``make test``), this runner on many
``random.Random`` ones (not in ``make test``).

Each target runs in a worker process of its own, with a per-input time limit (a hang is a failure)
and an address-space limit, and its peak RSS is checked against the target's bound
(:data:`DEFAULT_RSS_BOUND_MIB` unless the target says otherwise). A failure is any other exception
(MemoryError included), a hang, or the RSS bound exceeded; the first one's input is saved to
``--repro-dir`` with its traceback, to replay with ``python -m bench.fuzz --replay TARGET FILE``.

Usage: ``python -m bench.fuzz [--inputs N] [--jobs J] [--targets a,b] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/fuzz.py` as well as `python -m bench.fuzz`
    sys.path.insert(0, str(ROOT))

from replay_migrate.errors import ReplayMigrateError  # noqa: E402

DEFAULT_INPUTS = 100_000
DEFAULT_RSS_BOUND_MIB = 128
"""Peak RSS a target's worker may reach: the interpreter with numpy, blake3, zstd and msgpack
loaded is ~40 MiB and the inputs are KiB, so reaching this bound means an input made a decoder
allocate far beyond what the input could legitimately need."""
DEFAULT_TIMEOUT_S = 10.0
"""Seconds one input may take before it counts as a hang (inputs take milliseconds)."""
ADDRESS_SPACE_MIB = 4096
"""Address-space limit of a worker: an allocation a hostile input asks for fails there with a
MemoryError (a reported failure) instead of pushing the machine into the OOM killer."""
DEFAULT_REPRO_DIR = ROOT / "bench" / "results" / "fuzz-repro"


@dataclass(frozen=True)
class FuzzTarget:
    """One decoder under fuzz: ``run`` feeds it an input, ``generate`` makes one."""

    name: str
    run: Callable[[bytes], None]
    generate: Callable[[random.Random], bytes]
    rss_bound_mib: int = DEFAULT_RSS_BOUND_MIB
    what: str = ""


@dataclass
class Result:
    target: str
    inputs: int = 0
    rejected: int = 0
    """Inputs the decoder refused with a project error (the expected outcome of most mutations)."""
    failures: int = 0
    hangs: int = 0
    peak_rss_mib: float = 0.0
    rss_bound_mib: int = DEFAULT_RSS_BOUND_MIB
    seconds: float = 0.0
    first_failure: str = ""
    repro: str = ""

    @property
    def ok(self) -> bool:
        return self.failures == 0 and self.peak_rss_mib <= self.rss_bound_mib


def check_input(target: FuzzTarget, data: bytes) -> bool:
    """Run ``target`` on ``data``: True if it accepted the input, False if it refused it with a
    project error. Any other exception propagates (the unit tests let hypothesis report it)."""
    try:
        target.run(data)
    except ReplayMigrateError:
        return False
    return True


# -- generic mutation ------------------------------------------------------------------------------

INTERESTING_INTS: tuple[int, ...] = (
    0, 1, 2, 3, 7, 8, 15, 16, 31, 32, 63, 64, 127, 128, 255, 256, 511, 1023, 1024, 4095, 4096, 4097,
    65535, 65536, 1 << 20, (1 << 20) + 1, 1 << 24, (1 << 28) - 1, 1 << 28, 1 << 31, (1 << 32) - 1, 1 << 32,
    1 << 40, 1 << 44, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, -1, -2, -(1 << 31), -(1 << 63),
)


def interesting_int(rng: random.Random, near: int | None = None) -> int:
    """A boundary value, or a value next to ``near``."""
    if near is not None and rng.random() < 0.4:  # kept within what msgpack can carry
        return max(-(1 << 63), min((1 << 64) - 1, near + rng.choice((-1, 1, -4096, 4096, near, -near, 1 << 20))))
    return rng.choice(INTERESTING_INTS)


def mutate_bytes(rng: random.Random, data: bytes, max_ops: int = 4) -> bytes:
    """Byte-level mutations: flip bits, set bytes, write boundary integers, insert, delete, splice
    a copy of a piece elsewhere, truncate, extend."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, max_ops)):
        op = rng.randrange(8)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            i = min(pos, len(buf) - 1)
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            buf[min(pos, len(buf) - 1)] = rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))
        elif op == 2:
            width = rng.choice((1, 2, 4, 8))
            value = interesting_int(rng) % (1 << (8 * width))
            buf[pos : pos + width] = value.to_bytes(width, rng.choice(("big", "little")))
        elif op == 3:
            buf[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == 4 and buf:
            del buf[pos : pos + rng.randint(1, 16)]
        elif op == 5 and buf:
            start = rng.randrange(len(buf))
            piece = buf[start : start + rng.randint(1, 64)]
            buf[pos:pos] = piece
        elif op == 6:
            del buf[pos:]
        else:
            buf += rng.randbytes(rng.randint(1, 64))
    return bytes(buf)


def random_obj(rng: random.Random, depth: int = 0) -> Any:
    """A random msgpack-able value: what a peer can put where a field belongs."""
    k = rng.randrange(10 if depth < 2 else 7)
    if k == 0:
        return interesting_int(rng)
    if k == 1:
        return rng.choice((None, True, False))
    if k == 2:
        return rng.random() * rng.choice((1, 1e9, -1))
    if k == 3:
        return rng.randbytes(rng.choice((0, 1, 4, 8, 31, 32, 33, 200)))
    if k == 4:
        return rng.choice(("", "disk", "memory", "x" * 300, "\u00e9", "hello", "blocks"))
    if k == 5:
        return rng.randrange(256)
    if k == 6:
        return rng.randrange(-8, 1 << 16)
    if k == 7:
        return [random_obj(rng, depth + 1) for _ in range(rng.randrange(4))]
    if k == 8:
        return {rng.choice(("t", "v", "n", "x", "p")): random_obj(rng, depth + 1) for _ in range(rng.randrange(3))}
    return [[]] * rng.randrange(3)


def mutate_obj(rng: random.Random, obj: Any, depth: int = 0) -> Any:
    """A copy of a decoded msgpack value with one node changed: a scalar replaced (by a boundary
    integer, a value of another type, a neighbour), bytes cut, extended or flipped, a list or map
    entry dropped, added or mutated in place."""
    if isinstance(obj, dict) and obj and rng.random() < 0.85:
        out = dict(obj)
        key = rng.choice(list(out))
        r = rng.random()
        if r < 0.1:
            del out[key]
        elif r < 0.15:
            out[rng.choice(("zz", key + "x" if isinstance(key, str) else "k"))] = random_obj(rng)
        else:
            out[key] = mutate_obj(rng, out[key], depth + 1)
        return out
    if isinstance(obj, list) and obj and rng.random() < 0.85:
        out_l = list(obj)
        i = rng.randrange(len(out_l))
        r = rng.random()
        if r < 0.1:
            del out_l[i]
        elif r < 0.2:
            out_l.insert(i, random_obj(rng))
        elif r < 0.25:
            out_l.append(out_l[i])
        else:
            out_l[i] = mutate_obj(rng, out_l[i], depth + 1)
        return out_l
    if isinstance(obj, bool) or obj is None:
        return random_obj(rng)
    if isinstance(obj, int):
        return interesting_int(rng, obj) if rng.random() < 0.8 else random_obj(rng)
    if isinstance(obj, bytes):
        return mutate_bytes(rng, obj) if rng.random() < 0.8 else random_obj(rng)
    if isinstance(obj, str):
        return rng.choice((obj + "x", obj[:-1], obj * 50, "", "\x00", obj.upper())) if rng.random() < 0.8 \
            else random_obj(rng)
    return random_obj(rng)


def mutating(seeds: Sequence[bytes]) -> Callable[[random.Random], bytes]:
    """A generator for a target without a structured one: byte mutations of one of ``seeds``."""
    corpus = [bytes(s) for s in seeds] or [b""]

    def generate(rng: random.Random) -> bytes:
        data = rng.choice(corpus)
        return data if rng.random() < 0.05 else mutate_bytes(rng, data, max_ops=8)

    return generate


# -- the runner --------------------------------------------------------------------------------------


class _Hang(Exception):
    """Raised by the per-input timer (deliberately not a project error)."""


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise _Hang("input took longer than the time limit")


def _peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM, which :func:`_reset_peak_rss` can reset; else ru_maxrss)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_rss() -> None:
    """Start the peak RSS afresh (Linux ``clear_refs`` 5), so a target run in a process that did
    other work before (``--jobs 0``, the tests) is measured alone."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _save_repro(repro_dir: Path, target: FuzzTarget, k: int, data: bytes, text: str) -> str:
    repro_dir.mkdir(parents=True, exist_ok=True)
    path = repro_dir / f"{target.name}-{k}.bin"
    path.write_bytes(data)
    path.with_suffix(".txt").write_text(text)
    return str(path)


def _one(target: FuzzTarget, k: int, seed: int, timeout_s: float, res: Result) -> tuple[bytes, str]:
    """Generate input ``k`` and run it: (the input, what went wrong or "")."""
    try:
        data = target.generate(random.Random(f"{seed}:{target.name}:{k}"))
    except Exception:  # a harness bug, reported like a failure so that it is seen
        return b"", "the generator failed:\n" + traceback.format_exc()
    try:
        if timeout_s:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            accepted = check_input(target, data)
        finally:
            if timeout_s:
                signal.setitimer(signal.ITIMER_REAL, 0)
    except _Hang:
        res.hangs += 1
        return data, f"hang: input {k} took more than {timeout_s} s\n"
    except Exception:  # a decoder let out something that is not a project error
        return data, traceback.format_exc()
    res.rejected += not accepted
    return data, ""


def fuzz(
    target: FuzzTarget,
    inputs: int,
    *,
    seed: int = 0,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    repro_dir: Path = DEFAULT_REPRO_DIR,
    progress: Callable[[str], None] | None = None,
) -> Result:
    """Run ``target`` on ``inputs`` generated inputs (input ``k`` from ``random.Random(seed, k)``, so
    any one can be regenerated alone) in this process; count what happened."""
    res = Result(target.name, rss_bound_mib=target.rss_bound_mib)
    _reset_peak_rss()
    use_timer = timeout_s > 0 and hasattr(signal, "setitimer")
    old = signal.signal(signal.SIGALRM, _on_alarm) if use_timer else None
    start = time.monotonic()
    try:
        for k in range(inputs):
            data, problem = _one(target, k, seed, timeout_s if use_timer else 0, res)
            res.inputs += 1
            if not problem and _peak_rss_mib() > target.rss_bound_mib:
                problem = f"peak RSS {_peak_rss_mib():.0f} MiB exceeds the bound of {target.rss_bound_mib} MiB\n"
            if problem:
                res.failures += 1
                if not res.repro:
                    res.first_failure = problem.strip().splitlines()[-1][:200]
                    res.repro = _save_repro(repro_dir, target, k, data, problem)
                if problem.startswith("peak RSS"):
                    break  # every later input would count again
            if progress is not None and (k + 1) % 10_000 == 0:
                progress(f"{target.name}: {k + 1} inputs, {res.failures} failures, {time.monotonic() - start:.0f} s")
    finally:
        if old is not None:
            signal.signal(signal.SIGALRM, old)
    res.seconds = time.monotonic() - start
    res.peak_rss_mib = _peak_rss_mib()
    return res


def table(results: Sequence[Result]) -> str:
    headers = ["target", "inputs", "rejected (project errors)", "failures", "hangs", "peak RSS MiB",
               "RSS bound MiB", "s", "first failure"]
    rows = [
        [r.target, f"{r.inputs:,}", f"{r.rejected:,}", r.failures, r.hangs, f"{r.peak_rss_mib:.0f}",
         r.rss_bound_mib, f"{r.seconds:.0f}", f"{r.first_failure} ({r.repro})" if r.repro else ""]
        for r in results
    ]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _worker(args: argparse.Namespace) -> int:
    """Run one target in this (fresh) process and print its Result as JSON on stdout."""
    from bench.fuzz_targets import targets_by_name

    limit = ADDRESS_SPACE_MIB << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    target = targets_by_name()[args.worker]
    res = fuzz(target, args.inputs, seed=args.seed, timeout_s=args.timeout, repro_dir=args.repro_dir,
               progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(res.__dict__))
    return 0


def _run_workers(names: Sequence[str], args: argparse.Namespace) -> list[Result]:
    """One worker process per target, ``args.jobs`` at a time; results in ``names`` order."""
    pending = list(names)
    running: dict[str, subprocess.Popen[str]] = {}
    done: dict[str, Result] = {}
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            argv = [sys.executable, "-m", "bench.fuzz", "--worker", name, "--inputs", str(args.inputs),
                    "--seed", str(args.seed), "--timeout", str(args.timeout), "--repro-dir", str(args.repro_dir)]
            running[name] = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
            print(f"{name}: started", file=sys.stderr, flush=True)
        # wait for whichever worker ends first (WNOWAIT: Popen still reaps it and gets its status)
        info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
        name, proc = next(((n, p) for n, p in running.items() if info is not None and p.pid == info.si_pid),
                          next(iter(running.items())))
        out, _ = proc.communicate()
        del running[name]
        try:
            done[name] = Result(**json.loads(out.strip().splitlines()[-1]))
        except (ValueError, IndexError, TypeError):
            done[name] = Result(name, failures=1, first_failure=f"worker died (exit {proc.returncode})")
        print(f"{name}: done", file=sys.stderr, flush=True)
    return [done[n] for n in names]


def main(argv: Sequence[str] | None = None) -> int:
    """Fuzz every registered target (or ``--targets``); print the table; exit 1 on any failure."""
    from bench.fuzz_targets import targets_by_name

    ap = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", type=int, default=DEFAULT_INPUTS, help="inputs per target (default %(default)s)")
    ap.add_argument("--targets", help="comma-separated target names (default: all)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="targets fuzzed at once, each in its own process; 0 = all in this process")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per input before a hang")
    ap.add_argument("--repro-dir", type=Path, default=DEFAULT_REPRO_DIR)
    ap.add_argument("--out", type=Path, help="also write the table (markdown) to this file")
    ap.add_argument("--list", action="store_true", help="list the targets and exit")
    ap.add_argument("--replay", nargs=2, metavar=("TARGET", "FILE"), help="run one target on one saved input")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return _worker(args)
    registry = targets_by_name()
    if args.list:
        for t in registry.values():
            print(f"{t.name:<16} {t.what}")
        return 0
    if args.replay:
        name, path = args.replay
        accepted = check_input(registry[name], Path(path).read_bytes())  # anything else: its traceback
        print(f"{name}: input {'accepted' if accepted else 'refused with a project error'}")
        return 0
    names = args.targets.split(",") if args.targets else list(registry)
    unknown = [n for n in names if n not in registry]
    if unknown:
        ap.error(f"unknown targets: {', '.join(unknown)} (see --list)")
    start = time.monotonic()
    if args.jobs <= 0:
        results = [fuzz(registry[n], args.inputs, seed=args.seed, timeout_s=args.timeout, repro_dir=args.repro_dir)
                   for n in names]
    else:
        results = _run_workers(names, args)
    text = table(results)
    elapsed = time.monotonic() - start
    summary = (f"{len(results)} targets, {args.inputs:,} inputs each, seed {args.seed}, {args.jobs} jobs, "
               f"{elapsed:.0f} s; a failure is any exception but a project error, a hang (> {args.timeout:g} s per "
               f"input) or a peak RSS above the target's bound.\n")
    print(text + "\n" + summary)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# fuzz\n\n`python -m bench.fuzz {' '.join(argv if argv is not None else sys.argv[1:])}`"
                            f"\n\n{text}\n{summary}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
