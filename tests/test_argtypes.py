"""cli.argtypes: numbers on the command line are refused at parse time, not minutes later."""

from __future__ import annotations

import argparse

import pytest

from cli.argtypes import non_negative, positive, positive_int


@pytest.mark.parametrize("bad", ["0", "-1", "nan", "inf", "-inf", "", "1s", "0x10"])
def test_positive_refuses(bad: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        positive(bad)


def test_accepted_values() -> None:
    assert positive("0.5") == 0.5 and positive("1e3") == 1000.0
    assert non_negative("0") == 0.0 and positive_int("16") == 16


@pytest.mark.parametrize(("fn", "bad"), [(non_negative, "-0.1"), (non_negative, "nan"), (positive_int, "0"),
                                         (positive_int, "1.5"), (positive_int, "-3")])
def test_the_others_refuse(fn: object, bad: str) -> None:
    assert callable(fn)
    with pytest.raises(argparse.ArgumentTypeError):
        fn(bad)
