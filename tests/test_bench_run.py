"""bench/run.py: `make bench BENCH="differ scaling"` runs only the named benchmarks, in the suite's
order, and refuses a name that is none of them (no benchmark is run here)."""

from __future__ import annotations

import sys

import pytest

from bench import run


def test_only_the_named_benchmarks_run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    fake = [(name, [sys.executable, "-c", f"print('ran {name}')"], True) for name in ("a", "b", "c")]
    monkeypatch.setattr(run, "BENCHES", fake)
    assert run.main(["c", "a"]) == 0
    out = capsys.readouterr().out
    assert "ran a" in out and "ran c" in out and "ran b" not in out
    assert out.index("ran a") < out.index("ran c")


def test_an_unknown_name_is_refused(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(run, "BENCHES", [("a", [sys.executable, "-c", "raise SystemExit(3)"], True)])
    with pytest.raises(SystemExit) as e:
        run.main(["nosuch"])
    assert e.value.code == 2 and "no benchmark nosuch" in capsys.readouterr().err
    assert run.main([]) == 1  # every benchmark by default; a failing one fails the suite


def test_an_opt_in_benchmark_runs_only_when_named(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    fake = [(name, [sys.executable, "-c", f"print('ran {name}')"], True) for name in ("a", "service")]
    monkeypatch.setattr(run, "BENCHES", fake)
    assert run.main([]) == 0
    assert "ran service" not in capsys.readouterr().out
    assert run.main(["service"]) == 0
    assert "ran service" in capsys.readouterr().out
