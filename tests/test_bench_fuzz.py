"""bench/fuzz.py: the fuzz runner counts, saves reproducers, catches hangs and RSS, runs workers;
bench/fuzz_targets.py: the registry and its generators (the targets themselves are tested in the
test module of the decoder each one fuzzes)."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from bench import fuzz
from bench.fuzz import FuzzTarget, check_input, mutate_bytes, mutate_obj, mutating
from bench.fuzz_targets import external, targets, targets_by_name
from replay_migrate.errors import ImageError


def _picky(data: bytes) -> None:
    """Refuses odd lengths with a project error; lets a KeyError out on inputs starting with 'K'."""
    if data[:1] == b"K":
        raise KeyError("a decoder bug")
    if len(data) % 2:
        raise ImageError("odd")


PICKY = FuzzTarget("picky", _picky, mutating([b"ab", b"Kx", b"abcd"]))


def test_check_input_tells_accepted_refused_and_lets_bugs_out() -> None:
    assert check_input(PICKY, b"ab") is True
    assert check_input(PICKY, b"abc") is False
    with pytest.raises(KeyError):
        check_input(PICKY, b"K")


def test_fuzz_counts_failures_and_saves_the_first_reproducer(tmp_path: Path) -> None:
    res = fuzz.fuzz(PICKY, 300, seed=1, repro_dir=tmp_path)
    assert res.inputs == 300 and res.failures > 0 and res.rejected > 0 and not res.ok
    assert "KeyError" in res.first_failure
    repro = Path(res.repro)
    assert repro.parent == tmp_path and repro.read_bytes()[:1] == b"K"
    assert "KeyError" in repro.with_suffix(".txt").read_text()
    again = fuzz.fuzz(PICKY, 300, seed=1, repro_dir=tmp_path / "again")
    assert (again.failures, again.rejected) == (res.failures, res.rejected)  # inputs depend on the seed only


def test_a_hang_is_a_failure(tmp_path: Path) -> None:
    def spin(data: bytes) -> None:
        if data == b"spin":
            while True:
                pass

    res = fuzz.fuzz(FuzzTarget("spin", spin, lambda rng: rng.choice((b"spin", b"ok"))), 6, timeout_s=0.2,
                    repro_dir=tmp_path)
    assert res.hangs > 0 and res.failures == res.hangs and "hang" in res.first_failure


def test_an_rss_bound_is_checked(tmp_path: Path) -> None:
    hog: list[bytearray] = []

    def allocate(data: bytes) -> None:
        hog.append(bytearray(b"x" * (64 << 20)))

    bound = int(fuzz._peak_rss_mib()) + 16
    res = fuzz.fuzz(FuzzTarget("hog", allocate, lambda rng: b"", rss_bound_mib=bound), 3, repro_dir=tmp_path)
    hog.clear()
    assert res.failures == 1 and res.inputs == 1 and "exceeds the bound" in res.first_failure and not res.ok


def test_a_generator_bug_is_reported(tmp_path: Path) -> None:
    def broken(rng: random.Random) -> bytes:
        raise ValueError("harness bug")

    res = fuzz.fuzz(FuzzTarget("broken", _picky, broken), 2, repro_dir=tmp_path)
    assert res.failures == 2 and "harness bug" in res.first_failure


SEEDS = (b"ab", b"abcd")
"""Valid inputs of ``_picky``, for the external registration below."""


def test_a_target_defined_elsewhere_is_one_line() -> None:
    """What the service and cli helpers' targets look like: named by "module:attribute"."""
    by_seeds = external("ext", "test_bench_fuzz:_picky", seeds="test_bench_fuzz:SEEDS")
    res = fuzz.fuzz(by_seeds, 200, seed=3)
    assert res.inputs == 200 and 0 < res.rejected < 200
    by_generator = external("ext-log", "bench.fuzz_targets:run_log", generate="bench.fuzz_targets:generate_log")
    assert fuzz.fuzz(by_generator, 50).ok
    raw = external("ext-raw", "bench.fuzz_targets:run_log")
    assert fuzz.fuzz(raw, 50).rejected == 50


def test_mutators_change_things_and_stay_packable() -> None:
    rng = random.Random(0)
    data = bytes(range(64))
    assert sum(mutate_bytes(rng, data) != data for _ in range(100)) > 90
    msg = {"t": "blocks", "v": 2, "n": 3, "k": b"\x00\x02", "p": [None, {"l": 1, "d": b"x"}]}
    import msgpack

    for _ in range(500):
        msgpack.packb(mutate_obj(rng, msg), use_bin_type=True)


def test_the_registry() -> None:
    names = [t.name for t in targets()]
    assert len(names) == len(set(names)) >= 9
    assert {"log", "channel-host", "channel-agent", "protocol-target", "protocol-source", "save-image",
            "save-header", "tree-file", "leaf-digests"} <= set(names)
    assert targets_by_name([PICKY])["picky"] is PICKY


OWN_TESTS = {"session": "test_session.py", "checkpoint-stream": "test_ckstream.py", "cli-files": "test_fileargs.py"}
"""Targets whose unit tests have strategies of their own (hypothesis-built envelopes, odd files)."""


def test_make_test_runs_every_target() -> None:
    """Each registered target's unit tests: ``fuzz_tests(NAME)`` (tests/fuzzkit.py) in the test
    module of its decoder, once, or a test module of its own strategies."""
    tests = Path(__file__).parent
    calls = re.findall(r'fuzz_tests\("([a-z-]+)"', "".join(p.read_text() for p in sorted(tests.glob("test_*.py"))))
    assert len(calls) == len(set(calls))
    assert set(calls) | set(OWN_TESTS) == {t.name for t in targets()}
    for name, module in OWN_TESTS.items():
        assert "def test_fuzz" in (tests / module).read_text(), name


@pytest.mark.parametrize("name", [t.name for t in targets()])
def test_every_generator_is_deterministic_and_mostly_refused(name: str) -> None:
    """Input k depends on the seed only (so a failure can be regenerated), and the generators
    mutate enough that most inputs are refused, but not all (valid inputs are in the mix). Targets
    that turn every refusal into output themselves (the channel's agent side, the service core, the
    command line) only have to accept."""
    target = targets_by_name()[name]
    assert target.generate(random.Random("s:1")) == target.generate(random.Random("s:1"))
    outcomes = [check_input(target, target.generate(random.Random(k))) for k in range(200)]
    accepted = sum(outcomes)
    assert 0 < accepted and (name.startswith("channel") or name in ("session", "cli-files") or accepted < 150), \
        accepted


def test_main_in_process_prints_and_writes_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fuzz.md"
    rc = fuzz.main(["--inputs", "50", "--jobs", "0", "--targets", "log,tree-file", "--out", str(out),
                    "--repro-dir", str(tmp_path / "repro")])
    text = capsys.readouterr().out
    assert rc == 0
    assert "| log | 50 |" in text and "| tree-file | 50 |" in text
    assert out.read_text().startswith("# fuzz") and "| log | 50 |" in out.read_text()


def test_main_runs_targets_in_worker_processes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = fuzz.main(["--inputs", "30", "--jobs", "2", "--targets", "channel-agent,save-header,leaf-digests",
                    "--repro-dir", str(tmp_path)])
    text = capsys.readouterr().out
    assert rc == 0
    for name in ("channel-agent", "save-header", "leaf-digests"):
        assert f"| {name} | 30 |" in text


def test_main_list_replay_and_unknown_targets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert fuzz.main(["--list"]) == 0
    assert "protocol-target" in capsys.readouterr().out
    saved = tmp_path / "in.bin"
    saved.write_bytes(b"not a log")
    assert fuzz.main(["--replay", "log", str(saved)]) == 0
    assert "refused with a project error" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        fuzz.main(["--targets", "nosuch"])
